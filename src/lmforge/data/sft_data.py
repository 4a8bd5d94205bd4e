"""SFT data: prompt/response pairs -> token ids with a loss mask -> length-bucketed batches.

Pairs come from the configured source:

* ``data=synthetic``: ``data.n_sft`` tasks of the world's ``train`` split (validation: its
  ``val`` split), rendered with ``data.prompt_template`` and ``data.response_prefix``;
* ``data=jsonl``: one pair per record from ``data.prompt_field`` / ``data.response_field``
  (the prompt is rendered with the template too); validation from ``data.val_path``, else a
  deterministic ``data.val_fraction`` share chosen by a stable hash of the prompt (so the same
  prompt never lands in both splits).

Each example is ``rendered prompt + response + EOS`` (templates.encode_pair: a prompt too long
for ``algo.seq_len + 1`` tokens loses tokens from the LEFT; truncations are counted and logged).
The model reads ids[:-1] and predicts ids[1:]; only targets that are response tokens (the EOS
included) carry loss, prompt and padding targets are IGNORE_INDEX.

Bad records (policy ``data.on_bad_record``, see templates.BadRecords): unreadable lines
(malformed JSON, bad UTF-8, not an object), missing or non-string fields, empty prompt or
response, and responses that do not fit the context. Each is an error naming ``file:line``,
or with ``skip`` counted per reason and logged; nothing is dropped silently.

Batching -- why length bucketing and not packing
------------------------------------------------
Packing several examples into one row needs attention isolation between them: a
block-diagonal causal mask. lmforge's Transformer takes explicit per-token ``positions``
but only a (B, S) key-padding ``attention_mask`` (model/transformer.py,
build_attention_mask), so packed examples would attend to each other. We therefore do
LENGTH BUCKETING, which needs no model change: every epoch the examples are shuffled, cut
into mega-batches of ``bucket_size`` batches, each mega-batch is sorted by length and cut into
batches, and the batch order is shuffled again. A batch is RIGHT-padded to its longest
example. Right padding needs no attention mask at all: causal attention never lets a real
token see a pad to its right, and default positions 0..T-1 are each example's own positions,
so every real token computes exactly what it would alone (and SDPA keeps its fused causal
kernel). ``algo.packing=none`` gives plain shuffled batches with the same dynamic padding, the
baseline bench/sft_packing.py compares against.

Batches are a pure function of (seed, global batch number), as for pretraining: a resumed run
reads exactly the batches the uninterrupted run would have read, and ranks read distinct ones.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lmforge.data.config import use_pinned_memory
from lmforge.data.templates import BadRecords, encode_pair, render_prompt
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PACKING_MODES = ("bucket", "none")


# ============================================================================ pairs


@dataclass
class Pair:
    """One prompt/response pair before tokenization. ``prompt`` is already rendered with the
    template, ``response`` already carries the response prefix. ``origin``: file:line etc."""

    prompt: str
    response: str
    origin: str
    raw_prompt: str = ""  # the prompt before the template (samples, evaluation)


def _check_text(value, field_name: str, config_key: str, what: str, where: str, bad: BadRecords) -> str | None:
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        bad.report(f"non-string {what}", where, f"field {field_name!r} ({config_key}) is {kind}, expected a string")
        return None
    if not value.strip():
        bad.report(f"empty {what}", where, f"field {field_name!r} ({config_key}) is blank")
        return None
    return value


def make_pair(
    prompt,
    response,
    where: str,
    template: str,
    response_prefix: str,
    bad: BadRecords,
    prompt_key: str = "prompt",
    response_key: str = "response",
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> Pair | None:
    """A validated Pair, or None (after bad.report) for an empty or non-string field."""
    p = _check_text(prompt, prompt_field, prompt_key, "prompt", where, bad)
    r = _check_text(response, response_field, response_key, "response", where, bad)
    if p is None or r is None:
        return None
    return Pair(render_prompt(template, p), response_prefix + r, where, raw_prompt=p)


def synthetic_pairs(cfg, split: str, n: int) -> list[Pair]:
    """``n`` tasks of the world's ``split`` with their correct answers, rendered by the config."""
    from lmforge.world.generator import SyntheticWorld

    bad = BadRecords(cfg.on_bad_record)
    pairs = []
    for i, task in enumerate(SyntheticWorld(cfg.seed).tasks(n, split)):
        pair = make_pair(
            task.prompt, task.answer, f"synthetic:{split}:{i}", cfg.prompt_template, cfg.response_prefix, bad
        )
        if pair is not None:
            pairs.append(pair)
    bad.log_summary(f"synthetic {split} pairs")
    return pairs


def iter_jsonl_tolerant(path: str, bad: BadRecords, config_key: str = "data.path") -> Iterator[tuple[int, dict]]:
    """``(line, object)`` for each readable non-blank line of a JSONL file.

    Same checks and messages as sources.iter_jsonl_records, but an unreadable line goes
    through ``bad``: with policy skip it is counted and reading goes on.
    """
    from lmforge.data import sources

    def report(e: DataError) -> None:
        detail = str(e)
        where = detail.split(": ", 1)[0]
        bad.report("unreadable line", where, detail[len(where) + 2 :])

    yield from sources.iter_jsonl_records(path, config_key, on_error=report)


def jsonl_pairs(cfg, path: str, bad: BadRecords, config_key: str = "data.path") -> list[Pair]:
    """One Pair per good record of a JSONL file (prompt_field/response_field)."""
    pairs = []
    n_records = 0
    for lineno, obj in iter_jsonl_tolerant(path, bad, config_key):
        n_records += 1
        where = f"{path}:{lineno}"
        missing = [f for f in (cfg.prompt_field, cfg.response_field) if f not in obj]
        if missing:
            keys = {cfg.prompt_field: "data.prompt_field", cfg.response_field: "data.response_field"}
            bad.report(
                "missing field",
                where,
                f"no field {missing[0]!r} ({keys[missing[0]]}); fields present: {', '.join(map(str, obj)) or '(none)'}",
            )
            continue
        pair = make_pair(
            obj[cfg.prompt_field],
            obj[cfg.response_field],
            where,
            cfg.prompt_template,
            cfg.response_prefix,
            bad,
            "data.prompt_field",
            "data.response_field",
            cfg.prompt_field,
            cfg.response_field,
        )
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise DataError(
            f"{path} ({config_key}) has {n_records} record(s) and no usable prompt/response pair; "
            f"check the file, data.prompt_field={cfg.prompt_field!r} and data.response_field={cfg.response_field!r}"
        )
    return pairs


def hash_fraction(text: str) -> float:
    """A stable number in [0, 1) for a string (SHA-256; never Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_by_hash(pairs: list[Pair], val_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """A deterministic share of pairs for validation, by a hash of the (raw) prompt, so
    duplicates of one prompt stay together. At least one validation pair when there are two."""
    fracs = [hash_fraction(p.raw_prompt or p.prompt) for p in pairs]
    val_idx = {i for i, f in enumerate(fracs) if f < val_fraction}
    if not val_idx and len(pairs) >= 2:
        val_idx = {min(range(len(pairs)), key=fracs.__getitem__)}
        log.warning("data.val_fraction=%s selected no validation record of %d; using 1", val_fraction, len(pairs))
    if len(val_idx) == len(pairs):
        raise DataError(
            f"data.val_fraction={val_fraction} leaves no training record of {len(pairs)}: "
            "lower data.val_fraction or give data.val_path"
        )
    train = [p for i, p in enumerate(pairs) if i not in val_idx]
    val = [p for i, p in enumerate(pairs) if i in val_idx]
    return train, val


def load_pairs(cfg, n_val: int) -> tuple[list[Pair], list[Pair]]:
    """(train, val) pairs of the configured source; at most n_val validation pairs."""
    if cfg.source == "synthetic":
        return synthetic_pairs(cfg, "train", cfg.n_sft), synthetic_pairs(cfg, "val", n_val)
    if cfg.source == "jsonl":
        bad = BadRecords(cfg.on_bad_record)
        train = jsonl_pairs(cfg, cfg.path, bad, "data.path")
        if cfg.val_path:
            val = jsonl_pairs(cfg, cfg.val_path, bad, "data.val_path")
        else:
            train, val = split_by_hash(train, cfg.val_fraction)
        bad.log_summary("SFT records")
        return train, val[:n_val]
    raise DataError(
        f"data.source={cfg.source!r} has no prompt/response pairs for SFT: use data=synthetic or "
        "data=jsonl (with data.prompt_field and data.response_field)"
    )


# ========================================================================= tokens


@dataclass
class SFTExample:
    ids: list[int]  # rendered prompt + response + EOS
    n_prompt: int  # the first n_prompt ids are prompt tokens
    origin: str

    @property
    def n_inputs(self) -> int:
        """Tokens the model reads: all but the last."""
        return len(self.ids) - 1


@dataclass
class EncodeStats:
    n_examples: int = 0
    n_truncated: int = 0  # prompts cut from the left to fit
    n_too_long: int = 0  # responses that do not fit at all (skipped under policy skip)
    bad_counts: dict[str, int] = field(default_factory=dict)


def encode_pairs(
    pairs: Iterable[Pair], tok: Tokenizer, seq_len: int, bad: BadRecords, stats: EncodeStats | None = None
) -> list[SFTExample]:
    """Tokenize pairs to at most seq_len + 1 ids (the model reads seq_len of them)."""
    stats = stats if stats is not None else EncodeStats()
    out = []
    for pair in pairs:
        try:
            enc = encode_pair(tok, pair.prompt, pair.response, seq_len + 1)
        except DataError as e:
            stats.n_too_long += 1
            bad.report("response longer than the context", pair.origin, f"{e}; raise algo.seq_len={seq_len}")
            continue
        stats.n_truncated += int(enc.truncated)
        out.append(SFTExample(enc.ids, enc.n_prompt, pair.origin))
    stats.n_examples += len(out)
    stats.bad_counts = dict(bad.counts)
    return out


def collate(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) inputs, shifted labels (IGNORE_INDEX on prompt and pad targets) and a
    real-token mask; T is the longest example's input length."""
    T = max(e.n_inputs for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        n = e.n_inputs
        input_ids[row, :n] = ids[:-1]
        mask[row, :n] = True
        # Input position t predicts ids[t + 1]: supervised iff ids[t + 1] is a response token.
        start = max(e.n_prompt - 1, 0)
        labels[row, start:n] = ids[start + 1 :]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


# ========================================================================= batching


def plan_epoch(
    lengths: list[int], batch_size: int, packing: str, seed: int, epoch: int, bucket_size: int = 64
) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, a pure function of its arguments.

    none: shuffle, cut into batches. bucket: shuffle, cut into mega-batches of bucket_size
    batches, sort each by length, cut into batches, shuffle the batch order.
    """
    if packing not in PACKING_MODES:
        raise DataError(f"algo.packing={packing!r}: use one of {PACKING_MODES}")
    rng = random.Random(f"lmforge-sft/{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing == "none":
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * max(1, bucket_size)
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda j: lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def plan_eval(lengths: list[int], batch_size: int, packing: str) -> list[list[int]]:
    """Fixed validation batches: in order (none) or sorted by length (bucket)."""
    order = list(range(len(lengths)))
    if packing == "bucket":
        order.sort(key=lambda j: lengths[j])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class TrainBatches(IterableDataset):
    """An endless stream of collated batches; global batch k = i * world_size + rank is batch
    k mod n of epoch k // n's plan."""

    def __init__(
        self,
        examples: list[SFTExample],
        batch_size: int,
        packing: str,
        seed: int,
        pad_id: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        bucket_size: int = 64,
    ):
        if not examples:
            raise DataError("no SFT training example (every record was skipped?)")
        self.examples, self.batch_size, self.packing, self.seed = examples, batch_size, packing, seed
        self.pad_id, self.start_batch, self.rank, self.world_size = pad_id, start_batch, rank, world_size
        self.bucket_size = bucket_size
        self.lengths = [e.n_inputs for e in examples]
        self.n_per_epoch = len(plan_epoch(self.lengths, batch_size, packing, seed, 0, bucket_size))

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(k, self.n_per_epoch)
        if getattr(self, "_epoch", None) != epoch:
            self._plan = plan_epoch(self.lengths, self.batch_size, self.packing, self.seed, epoch, self.bucket_size)
            self._epoch = epoch
        return collate([self.examples[i] for i in self._plan[j]], self.pad_id)

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        i = self.start_batch + worker
        while True:
            yield self.batch(i * self.world_size + self.rank)
            i += n_workers


class FixedBatches(Dataset):
    def __init__(self, examples: list[SFTExample], plan: list[list[int]], pad_id: int):
        self.examples, self.plan, self.pad_id = examples, plan, pad_id

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return collate([self.examples[j] for j in self.plan[i]], self.pad_id)


@dataclass
class SFTBatching:
    batch_size: int
    seq_len: int
    val_batches: int
    seed: int
    packing: str = "bucket"
    bucket_size: int = 64


class SFTDataModule(L.LightningDataModule):
    def __init__(self, cfg, batching: SFTBatching, tokenizer: Tokenizer):
        super().__init__()
        self.cfg, self.batching, self.tokenizer = cfg, batching, tokenizer
        self.train_examples: list[SFTExample] | None = None
        self.val_examples: list[SFTExample] = []
        self.val_pairs: list[Pair] = []
        self.stats: dict[str, EncodeStats] = {}

    def prepare_data(self) -> None:
        self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is None:
            self._build()

    def _build(self) -> None:
        b = self.batching
        train_pairs, self.val_pairs = load_pairs(self.cfg, b.val_batches * b.batch_size)
        bad = BadRecords(self.cfg.on_bad_record)
        self.stats = {"train": EncodeStats(), "val": EncodeStats()}
        self.train_examples = encode_pairs(train_pairs, self.tokenizer, b.seq_len, bad, self.stats["train"])
        bad_val = BadRecords(self.cfg.on_bad_record)
        self.val_examples = encode_pairs(self.val_pairs, self.tokenizer, b.seq_len, bad_val, self.stats["val"])
        bad.log_summary("SFT training examples")
        bad_val.log_summary("SFT validation examples")
        for split, s in self.stats.items():
            log.info(
                "SFT %s: %d examples, %d prompt(s) truncated from the left to fit algo.seq_len=%d",
                split,
                s.n_examples,
                s.n_truncated,
                b.seq_len,
            )
            if s.n_truncated:
                log.warning(
                    "SFT %s: %d of %d prompts were truncated from the left (algo.seq_len=%d)",
                    split,
                    s.n_truncated,
                    s.n_examples,
                    b.seq_len,
                )
        if not self.train_examples:
            raise DataError("no SFT training example left (all records were skipped); see the warnings above")
        if not self.val_examples:
            raise DataError("no SFT validation example left; give more data or data.val_path")

    def data_stats(self) -> dict[str, float]:
        out = {}
        for split, s in self.stats.items():
            out[f"data/{split}_examples"] = s.n_examples
            out[f"data/{split}_truncated"] = s.n_truncated
            out[f"data/{split}_too_long"] = s.n_too_long
        return out

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step * trainer.accumulate_grad_batches
        b = self.batching
        ds = TrainBatches(
            self.train_examples,
            b.batch_size,
            b.packing,
            b.seed,
            self.tokenizer.pad_id,
            start,
            trainer.global_rank,
            trainer.world_size,
            b.bucket_size,
        )
        return DataLoader(
            ds,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            pin_memory=use_pinned_memory(self.cfg),
            persistent_workers=self.cfg.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        b = self.batching
        plan = plan_eval([e.n_inputs for e in self.val_examples], b.batch_size, b.packing)[: b.val_batches]
        return DataLoader(
            FixedBatches(self.val_examples, plan, self.tokenizer.pad_id), batch_size=None, shuffle=False, num_workers=0
        )
