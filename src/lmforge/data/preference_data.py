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

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmforge.data.config import use_pinned_memory
from lmforge.data.templates import BadRecords, encode_pair, render_prompt
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    """One comparison, as the model reads it: rendered prompt text and response texts."""

    prompt: str
    chosen: str
    rejected: str
    origin: str  # "file:line" or "synthetic:<split>:<i>", for messages
    # Ground truth, where known (synthetic): task kind and the judge's scores.
    kind: str | None = None
    chosen_score: float | None = None
    rejected_score: float | None = None


@dataclass
class EncodedPair:
    chosen: list[int]  # prompt + chosen response + EOS
    rejected: list[int]
    truncated: bool  # prompt tokens were dropped from the left of either sequence


# ===================================================================== parsing


def _json_type(value: object) -> str:
    names = {list: "an array", dict: "an object", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _text_field(obj: dict, name: str, where: str, config_key: str, bad: BadRecords) -> str | None:
    """obj[name] as a non-blank string, else a bad record (None)."""
    if name not in obj:
        present = ", ".join(map(str, obj)) or "(none)"
        bad.report(f"no field {name!r}", where, f"{config_key}; fields present: {present}")
        return None
    value = obj[name]
    if not isinstance(value, str):
        bad.report(f"field {name!r} is not a string", where, f"{config_key}; got {_json_type(value)}")
        return None
    if not value.strip():
        bad.report(f"empty field {name!r}", where, config_key)
        return None
    return value


def _distinct(chosen: str, rejected: str, where: str, bad: BadRecords) -> bool:
    if chosen.strip() == rejected.strip():
        bad.report("chosen and rejected are identical", where, "a pair must compare two different responses")
        return False
    return True


def parse_jsonl_record(
    obj: dict,
    where: str,
    bad: BadRecords,
    *,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    prompt_template: str = "{prompt}",
    response_prefix: str = "",
) -> PreferencePair | None:
    """A {prompt, chosen, rejected} record -> a rendered pair, or None (a counted bad record)."""
    prompt = _text_field(obj, prompt_field, where, "data.prompt_field", bad)
    chosen = _text_field(obj, chosen_field, where, "data.chosen_field", bad) if prompt is not None else None
    rejected = _text_field(obj, rejected_field, where, "data.rejected_field", bad) if chosen is not None else None
    if rejected is None or not _distinct(chosen, rejected, where, bad):
        return None
    return PreferencePair(
        render_prompt(prompt_template, prompt), response_prefix + chosen, response_prefix + rejected, where
    )


def split_dialogue(text: str, marker: str) -> tuple[str, str] | None:
    """Split a dialogue at its LAST `marker`: (prompt up to and including it, response after)."""
    i = text.rfind(marker)
    if i < 0:
        return None
    cut = i + len(marker)
    return text[:cut], text[cut:]


def parse_hh_record(
    obj: dict,
    where: str,
    bad: BadRecords,
    *,
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    assistant_marker: str = "\n\nAssistant:",
) -> PreferencePair | None:
    """An HH-RLHF record (two whole dialogues) -> a pair sharing the verbatim prompt, or None."""
    chosen = _text_field(obj, chosen_field, where, "data.chosen_field", bad)
    rejected = _text_field(obj, rejected_field, where, "data.rejected_field", bad) if chosen is not None else None
    if rejected is None:
        return None
    parts = []
    for name, text in ((chosen_field, chosen), (rejected_field, rejected)):
        split = split_dialogue(text, assistant_marker)
        if split is None:
            bad.report(f"no assistant turn in {name!r}", where, f"data.assistant_marker={assistant_marker!r}")
            return None
        parts.append(split)
    (p_c, r_c), (p_r, r_r) = parts
    if p_c != p_r:
        bad.report(
            "chosen and rejected dialogues differ before the last assistant turn",
            where,
            "both must share the conversation up to the final response",
        )
        return None
    for name, response in ((chosen_field, r_c), (rejected_field, r_r)):
        if not response.strip():
            bad.report(f"empty final response in {name!r}", where)
            return None
    if not _distinct(r_c, r_r, where, bad):
        return None
    return PreferencePair(p_c, r_c, r_r, where)


def iter_json_objects(path: str, bad: BadRecords, config_key: str = "data.path") -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line; malformed lines are bad records."""
    if not os.path.isfile(path):
        what = "is a directory, not a JSONL file" if os.path.isdir(path) else "file not found"
        raise DataError(f"{path!r} ({config_key}): {what}; relative paths are resolved from {os.getcwd()}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad.report("line is not valid UTF-8", where, f"byte {e.start} of the line")
                continue
            except json.JSONDecodeError as e:
                bad.report("malformed JSON", where, f"{e.msg} at column {e.colno}")
                continue
            if not isinstance(obj, dict):
                bad.report("line is not a JSON object", where, f"got {_json_type(obj)}")
                continue
            yield where, obj


def read_preference_file(path: str, cfg, bad: BadRecords, config_key: str = "data.path") -> list[PreferencePair]:
    """Every good pair of a jsonl or hh file (cfg: the data config)."""
    pairs = []
    for where, obj in iter_json_objects(path, bad, config_key):
        if cfg.source == "hh":
            pair = parse_hh_record(
                obj,
                where,
                bad,
                chosen_field=cfg.chosen_field,
                rejected_field=cfg.rejected_field,
                assistant_marker=cfg.assistant_marker,
            )
        else:
            pair = parse_jsonl_record(
                obj,
                where,
                bad,
                prompt_field=cfg.prompt_field,
                chosen_field=cfg.chosen_field,
                rejected_field=cfg.rejected_field,
                prompt_template=cfg.prompt_template,
                response_prefix=cfg.response_prefix,
            )
        if pair is not None:
            pairs.append(pair)
    return pairs


def is_val_prompt(prompt: str, val_fraction: float) -> bool:
    """Stable split by prompt: every pair of one prompt lands on the same side."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def synthetic_pairs(cfg, n: int, split: str, noise: float, seed_offset: int = 0) -> list[PreferencePair]:
    """The world's annotator's pairs, re-rendered with the configured template and prefix."""
    from lmforge.world.generator import SyntheticWorld
    from lmforge.world.tasks import parse_task, strip_prompt_template

    out, kinds = [], {}
    world = SyntheticWorld(cfg.seed)
    for i, r in enumerate(world.preference_pairs(n, split, noise=noise, seed_offset=seed_offset)):
        raw = strip_prompt_template(r["prompt"])
        if raw not in kinds:
            kinds[raw] = parse_task(raw).kind
        out.append(
            PreferencePair(
                render_prompt(cfg.prompt_template, raw),
                # The world writes responses as " " + text, the default response_prefix.
                cfg.response_prefix + r["chosen"][1:],
                cfg.response_prefix + r["rejected"][1:],
                f"synthetic:{split}:{i}" if not seed_offset else f"synthetic:{split}+{seed_offset}:{i}",
                kind=kinds[raw],
                chosen_score=r["chosen_score"],
                rejected_score=r["rejected_score"],
            )
        )
    return out


def _pair_key(p: PreferencePair) -> tuple[str, frozenset[str]]:
    return p.prompt, frozenset((p.chosen, p.rejected))


def unseen_pairs(cfg, n: int, trained: list[PreferencePair]) -> list[PreferencePair]:
    """``n`` noiseless-judge pairs of the world's *train* prompts that are not among ``trained``
    (in either order). With the held-out *test* prompts, they separate two questions: has the
    reward model learned the annotator's preferences (new pairs, familiar prompts), and does it
    carry them to prompts it never saw (whose answers the backbone may not know)?"""
    seen = {_pair_key(p) for p in trained}
    out: list[PreferencePair] = []
    for offset in range(1, 9):  # a fresh stream per round; most of its pairs are new
        for p in synthetic_pairs(cfg, 2 * n, "train", 0.0, seed_offset=offset):
            if _pair_key(p) not in seen:  # the world's pair distribution, less what was trained on
                out.append(p)
                if len(out) == n:
                    return out
    return out  # nearly all of the prompts' pairs were trained on: fewer than n remain


# ==================================================================== encoding


def encode_preference(tok: Tokenizer, pair: PreferencePair, max_len: int) -> EncodedPair:
    """Both sequences of a pair; DataError if a response (+EOS) cannot fit in max_len."""
    c = encode_pair(tok, pair.prompt, pair.chosen, max_len)
    r = encode_pair(tok, pair.prompt, pair.rejected, max_len)
    return EncodedPair(c.ids, r.ids, c.truncated or r.truncated)


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


def collate_pairs(pairs: list[EncodedPair], pad_id: int = 0, side: str = "right") -> dict[str, torch.Tensor]:
    """B pairs -> one (2B, T) batch: rows [0, B) chosen, rows [B, 2B) rejected."""
    ids, mask = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, side)
    return {"input_ids": ids, "attention_mask": mask}


class PairCollator:
    """Picklable collate_fn (DataLoader workers)."""

    def __init__(self, pad_id: int, side: str = "right"):
        self.pad_id, self.side = pad_id, side

    def __call__(self, pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        return collate_pairs(pairs, self.pad_id, self.side)


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
    def __init__(self, cfg, batching: PreferenceBatching, tokenizer: Tokenizer):
        super().__init__()
        self.cfg, self.batching, self.tokenizer = cfg, batching, tokenizer
        self.splits: PreferenceSplits | None = None
        self.collate = PairCollator(tokenizer.pad_id, "right")

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
