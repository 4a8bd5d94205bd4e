"""Preference pairs for reward modeling: records -> (prompt, chosen, rejected) -> token ids -> batches.

Sources (conf/data/<source>.yaml):

* jsonl: one object per line with `data.prompt_field`, `data.chosen_field` and
  `data.rejected_field`; the prompt is rendered with `data.prompt_template` and each
  response is `data.response_prefix + response` (the feedback app writes this format);
* hh (Anthropic HH-RLHF): `chosen` and `rejected` are whole dialogues sharing a prefix; each
  is split at its LAST `data.assistant_marker` into the prompt (up to and including the
  marker, used verbatim) and the response after it;
* synthetic: the world's simulated annotator (`SyntheticWorld.preference_pairs`).

A pair is encoded as two sequences, prompt + response + EOS, each cut from the LEFT of the
prompt when too long (the response end, where the reward is read, is never dropped). A batch
of B pairs is ONE right-padded (2B, T) tensor: the B chosen rows, then the B rejected rows.

Training pairs are read statelessly, like pretraining windows: global sample k is pair
perm_e[k mod N] with e = k // N and perm_e a permutation seeded by (seed, e), so a resumed
run reads exactly the batches the uninterrupted run would have read. Pairs of similar length
are grouped into batches (algo.length_group) to spend less compute on padding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmforge.data.config import use_pinned_memory
from lmforge.data.preference_records import (
    PreferencePair,
    extra_world_pairs,
    is_val_prompt,
    parse_jsonl_record,
    read_preference_file,
    synthetic_pairs,
    unseen_pairs,
)
from lmforge.data.templates import BadRecords, encode_pair
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class EncodedPair:
    chosen: list[int]  # prompt + chosen response + EOS
    rejected: list[int]
    truncated: bool  # prompt tokens were dropped from the left of either sequence
    # The first n_prompt_* ids of each sequence are prompt tokens (the rest is the response + EOS).
    n_prompt_chosen: int = 0
    n_prompt_rejected: int = 0
    # (chosen, rejected) sequence log-probabilities under a frozen reference policy, when an
    # offline preference stage precomputed them (algo=dpo algo.precompute_ref=true).
    ref_logps: tuple[float, float] | None = None


# ==================================================================== encoding


def encode_preference(tok: Tokenizer, pair: PreferencePair, max_len: int) -> EncodedPair:
    """Both sequences of a pair; DataError if a response (+EOS) cannot fit in max_len."""
    c = encode_pair(tok, pair.prompt, pair.chosen, max_len)
    r = encode_pair(tok, pair.prompt, pair.rejected, max_len)
    return EncodedPair(c.ids, r.ids, c.truncated or r.truncated, c.n_prompt, r.n_prompt)


def encode_preferences(
    tok: Tokenizer, pairs: list[PreferencePair], max_len: int, bad: BadRecords, what: str = "pairs"
) -> tuple[list[EncodedPair], list[int], int]:
    """(encoded pairs, index of each in `pairs`, how many had prompts cut from the left)."""
    out, kept, truncated = [], [], 0
    for i, pair in enumerate(pairs):
        try:
            enc = encode_preference(tok, pair, max_len)
        except DataError as e:
            bad.report("response does not fit the context", pair.origin, f"{e}; raise algo.seq_len")
            continue
        truncated += enc.truncated
        out.append(enc)
        kept.append(i)
    if truncated:
        log.warning(
            "%s: %d of %d pair(s) had prompt tokens cut from the left to fit algo.seq_len=%d",
            what,
            truncated,
            len(out),
            max_len,
        )
    return out, kept, truncated


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) ids and attention mask (1 = real) of sequences padded to the longest."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def collate_pairs(
    pairs: list[EncodedPair], pad_id: int = 0, side: str = "right", response_mask: bool = False
) -> dict[str, torch.Tensor]:
    """B pairs -> one (2B, T) batch: rows [0, B) chosen, rows [B, 2B) rejected.

    With `response_mask` (right padding only) also "response_mask", (2B, T) bool, True at the
    response tokens and EOS of each row, and, when every pair carries them, "ref_logps", (2B,)
    the precomputed reference log-probabilities in the same row order."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids, mask = pad_batch(seqs, pad_id, side)
    batch = {"input_ids": ids, "attention_mask": mask}
    if response_mask:
        if side != "right":
            raise ValueError("response_mask needs right-padded pairs")
        starts = [p.n_prompt_chosen for p in pairs] + [p.n_prompt_rejected for p in pairs]
        cols = torch.arange(ids.shape[1])
        lengths = torch.tensor([len(s) for s in seqs])
        batch["response_mask"] = (cols >= torch.tensor(starts)[:, None]) & (cols < lengths[:, None])
        if pairs and all(p.ref_logps is not None for p in pairs):
            batch["ref_logps"] = torch.tensor(
                [p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs], dtype=torch.float32
            )
    return batch


class PairCollator:
    """Picklable collate_fn (DataLoader workers)."""

    def __init__(self, pad_id: int, side: str = "right", response_mask: bool = False):
        self.pad_id, self.side, self.response_mask = pad_id, side, response_mask

    def __call__(self, pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        return collate_pairs(pairs, self.pad_id, self.side, self.response_mask)


# =================================================================== datamodule


class PairStream(IterableDataset):
    """Endless stream of training batches, a pure function of (seed, batch index).

    Global sample k is pair perm_e[k mod N], e = k // N; rank r reads samples i * world_size + r.
    Length grouping: each run of `group` consecutive batches of a rank is built from its
    group * batch_size samples sorted by length, the batches then shuffled, so a batch pads to
    a length close to its members' (random batches waste ~40% of a synthetic batch on padding).
    """

    def __init__(
        self,
        pairs: list[EncodedPair],
        batch_size: int,
        seed: int,
        start_batch: int,
        rank: int,
        world_size: int,
        group: int = 1,
        collate=None,
    ):
        if not pairs:
            raise DataError("no training pairs: check the data and data.on_bad_record")
        self.pairs, self.batch_size, self.seed, self.group = pairs, batch_size, seed, max(1, group)
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.collate = collate or PairCollator(0)
        self._perm: tuple[int, torch.Tensor] | None = None

    def pair(self, k: int) -> EncodedPair:
        """Global sample k: each epoch visits every pair once, in a fresh order."""
        n = len(self.pairs)
        epoch = k // n
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=g))
        return self.pairs[self._perm[1][k % n]]

    def group_batches(self, g: int) -> list[list[EncodedPair]]:
        """This rank's batches g * group ... (g + 1) * group - 1."""
        size = self.group * self.batch_size
        local = range(g * size, (g + 1) * size)
        pairs = [self.pair(i * self.world_size + self.rank) for i in local]
        if self.group > 1:
            pairs.sort(key=lambda p: max(len(p.chosen), len(p.rejected)))
        batches = [pairs[j : j + self.batch_size] for j in range(0, size, self.batch_size)]
        if self.group > 1:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * g + 1)
            batches = [batches[j] for j in torch.randperm(self.group, generator=gen)]
        return batches

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # Workers take turns by batch (worker w yields batches start + w, start + w + n_workers,
        # ...) and the loader interleaves them in order, so batches keep their order.
        j, cached = self.start_batch + worker, (-1, None)
        while True:
            g = j // self.group
            if cached[0] != g:
                cached = (g, self.group_batches(g))
            yield self.collate(cached[1][j % self.group])
            j += n_workers


@dataclass
class PreferenceBatching:
    batch_size: int  # pairs per micro-batch per rank (2x sequences per forward)
    seq_len: int
    val_batches: int
    seed: int
    length_group: int = 1  # batches per length-sorted group (1: plain random batches)


@dataclass
class PreferenceSplits:
    train: list[EncodedPair] = field(default_factory=list)
    val: list[EncodedPair] = field(default_factory=list)
    # Synthetic only: held-out "test" pairs labelled by the noiseless judge, and their truth.
    judge: list[EncodedPair] = field(default_factory=list)
    judge_pairs: list[PreferencePair] = field(default_factory=list)
    # Synthetic only: new noiseless-judge pairs of the training prompts (see unseen_pairs).
    judge_seen: list[EncodedPair] = field(default_factory=list)
    judge_seen_pairs: list[PreferencePair] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def load_preference_splits(cfg, batching: PreferenceBatching, tokenizer: Tokenizer) -> PreferenceSplits:
    """Read, check, split and encode the configured source's pairs."""
    bad = BadRecords(cfg.on_bad_record)
    n_val = batching.val_batches * batching.batch_size
    judge_raw: list[PreferencePair] = []
    seen_raw: list[PreferencePair] = []
    if cfg.source == "synthetic":
        train_raw = synthetic_pairs(cfg, cfg.n_pairs, "train", cfg.annotator_noise)
        if getattr(cfg, "extra_pairs", None):
            train_raw += extra_world_pairs(cfg, bad)
        val_raw = synthetic_pairs(cfg, n_val, "val", cfg.annotator_noise)
        judge_raw = synthetic_pairs(cfg, cfg.n_eval, "test", 0.0)
        seen_raw = unseen_pairs(cfg, cfg.n_eval, train_raw)
    elif cfg.source in ("jsonl", "hh", "feedback"):
        pairs = read_preference_records(cfg, bad)
        if getattr(cfg, "val_path", None):
            train_raw, val_raw = pairs, read_preference_file(cfg.val_path, cfg, bad, "data.val_path")
        else:
            train_raw = [p for p in pairs if not is_val_prompt(p.prompt, cfg.val_fraction)]
            val_raw = [p for p in pairs if is_val_prompt(p.prompt, cfg.val_fraction)]
        val_raw = val_raw[:n_val]
    else:
        raise DataError(f"data.source={cfg.source!r} has no preference pairs: use synthetic, jsonl, hh or feedback")
    out = PreferenceSplits()
    out.train, _, t_train = encode_preferences(tokenizer, train_raw, batching.seq_len, bad, "train pairs")
    out.val, _, t_val = encode_preferences(tokenizer, val_raw, batching.seq_len, bad, "val pairs")
    out.judge, kept, _ = encode_preferences(tokenizer, judge_raw, batching.seq_len, bad, "judge pairs")
    out.judge_pairs = [judge_raw[i] for i in kept]
    out.judge_seen, kept, _ = encode_preferences(tokenizer, seen_raw, batching.seq_len, bad, "judge pairs")
    out.judge_seen_pairs = [seen_raw[i] for i in kept]
    bad.log_summary(f"preference data ({cfg.source})")
    if not out.train or not out.val:
        raise DataError(
            f"preference data ({cfg.source}): {len(out.train)} training and {len(out.val)} validation "
            "pair(s) remain; need at least one of each (add data, give data.val_path, or raise "
            "data.val_fraction)"
        )
    out.counts = {
        "train_pairs": len(out.train),
        "val_pairs": len(out.val),
        "truncated_pairs": t_train + t_val,
        "skipped_records": sum(bad.counts.values()),
    }
    log.info("preference data (%s): %s", cfg.source, out.counts)
    return out


def read_preference_records(cfg, bad: BadRecords) -> list[PreferencePair]:
    """Every good pair of the configured file (jsonl, hh) or feedback database (feedback)."""
    if cfg.source == "feedback":
        return read_feedback_pairs(cfg, bad)
    return read_preference_file(cfg.path, cfg, bad)


def preference_texts(cfg) -> Iterator[str]:
    """Texts to train a tokenizer on when no checkpoint supplies one (jsonl, hh and feedback sources)."""
    bad = BadRecords("skip")  # the real read reports bad records by the configured policy
    for p in read_preference_records(cfg, bad):
        yield p.prompt + p.chosen
        yield p.prompt + p.rejected


def preference_tokenizer(cfg) -> Tokenizer:
    """A tokenizer for a from-scratch reward model: data.tokenizer.path, else trained on the data."""
    from lmforge.data.pretrain_data import load_or_train_tokenizer
    from lmforge.data.tokenizer import train_tokenizer

    if cfg.tokenizer.path or cfg.source == "synthetic":
        return load_or_train_tokenizer(cfg)
    return train_tokenizer(
        preference_texts(cfg), cfg.tokenizer.vocab_size, cfg.cache_dir, model_type=cfg.tokenizer.model_type
    )


class PreferenceDataModule(L.LightningDataModule):
    def __init__(self, cfg, batching: PreferenceBatching, tokenizer: Tokenizer, response_mask: bool = False):
        super().__init__()
        self.cfg, self.batching, self.tokenizer = cfg, batching, tokenizer
        self.splits: PreferenceSplits | None = None
        # response_mask: batches also mark the response tokens (offline preference optimization
        # scores the responses' log-probabilities; a reward model reads only the last token).
        self.collate = PairCollator(tokenizer.pad_id, "right", response_mask)

    def load(self) -> PreferenceSplits:
        if self.splits is None:
            self.splits = load_preference_splits(self.cfg, self.batching, self.tokenizer)
        return self.splits

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def train_dataloader(self) -> DataLoader:
        trainer, b = self.trainer, self.batching
        # Batches this rank has already consumed: resume reads on from exactly there.
        start = trainer.global_step * trainer.accumulate_grad_batches
        ds = PairStream(
            self.load().train,
            b.batch_size,
            b.seed,
            start,
            trainer.global_rank,
            trainer.world_size,
            b.length_group,
            self.collate,
        )
        return DataLoader(
            ds,
            batch_size=None,  # the stream yields whole batches
            num_workers=self.cfg.num_workers,
            pin_memory=use_pinned_memory(self.cfg),
            persistent_workers=self.cfg.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.load().val, batch_size=self.batching.batch_size, shuffle=False, collate_fn=self.collate)


# ======================================================================== the feedback app's database
# `algo=reward data=feedback data.db=...`: the pairs are exactly what `python -m lmforge.feedback export`
# would write (same rules: judgments, thumbs up/down on the same prompt, ties and both-bad only when
# asked), read at the start of the run from a read-only connection, so the app may keep running and
# labeling while a reward model trains on what is there.


def feedback_records(cfg) -> Iterator[dict]:
    """{prompt, chosen, rejected, origin, item_id, annotator} dicts from cfg.db (responses without
    the response_prefix, which the reward stage adds back from data.response_prefix)."""
    from lmforge.data.feedback_export import AGGREGATES, ExportOptions, preference_records
    from lmforge.data.feedback_store import Store, StoreError

    if cfg.aggregate not in AGGREGATES:
        raise DataError(f"data.aggregate={cfg.aggregate!r}: use one of {', '.join(AGGREGATES)}")
    try:
        store = Store(cfg.db, readonly=True)
    except FileNotFoundError:
        raise DataError(
            f"data.db={cfg.db}: no such feedback database (python -m lmforge.feedback serve "
            "makes one; its path is printed when it starts)"
        ) from None
    except StoreError as e:
        raise DataError(f"data.db={cfg.db}: {e}") from None
    opts = ExportOptions(
        keep_ties=cfg.include_ties,
        keep_both_bad=cfg.include_both_bad,
        thumbs=cfg.include_thumbs,
        aggregate=cfg.aggregate,
        annotators=list(cfg.annotators) if cfg.annotators else None,
        response_prefix=cfg.response_prefix,
    )
    yield from preference_records(store, opts).records


def read_feedback_pairs(cfg, bad) -> list:
    """The database's pairs as the reward stage's PreferencePair (rendered with
    data.prompt_template, responses prefixed with data.response_prefix); `bad` is the
    BadRecords of the run."""
    pairs = []
    for record in feedback_records(cfg):
        where = f"{cfg.db}#item={record['item_id']}:{record['origin']}"
        pair = parse_jsonl_record(
            record, where, bad, prompt_template=cfg.prompt_template, response_prefix=cfg.response_prefix
        )
        if pair is not None:
            pairs.append(pair)
    return pairs
