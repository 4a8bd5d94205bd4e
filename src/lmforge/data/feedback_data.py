"""Preference pairs straight from the feedback app's database: `algo=reward data=feedback data.db=...`.

The pairs are exactly what `python -m lmforge.feedback export` would write (same rules:
judgments, thumbs up/down on the same prompt, ties and both-bad only when asked; see
lmforge.feedback.export), read at the start of the run from a read-only connection, so the
app may keep running and labeling while a reward model trains on what is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

from omegaconf import MISSING

from lmforge.data.config import DataConfig
from lmforge.data.errors import DataError


@dataclass
class FeedbackDataConfig(DataConfig):
    source: str = "feedback"
    db: str = MISSING  # the feedback app's SQLite database (feedback.db)
    # Ties / both-bad as two mirrored pairs (pulling the two rewards together); else left out.
    include_ties: bool = False
    include_both_bad: bool = False
    include_thumbs: bool = True  # up-voted over down-voted responses of the same prompt
    aggregate: str = "all"  # all: every annotator's judgment is a pair | majority: one per item
    annotators: Optional[List[str]] = None  # only these annotators (null: everyone)
    # Held-out pairs are split by prompt hash with val_fraction (DataConfig).


def feedback_records(cfg) -> Iterator[dict]:
    """{prompt, chosen, rejected, origin, item_id, annotator} dicts from cfg.db (responses without
    the response_prefix, which the reward stage adds back from data.response_prefix)."""
    from lmforge.feedback.export import AGGREGATES, ExportOptions, preference_records
    from lmforge.feedback.store import Store, StoreError

    if cfg.aggregate not in AGGREGATES:
        raise DataError(f"data.aggregate={cfg.aggregate!r}: use one of {', '.join(AGGREGATES)}")
    try:
        store = Store(cfg.db, readonly=True)
    except FileNotFoundError:
        raise DataError(f"data.db={cfg.db}: no such feedback database (python -m lmforge.feedback serve "
                        "makes one; its path is printed when it starts)") from None
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
    from lmforge.data.preference_data import parse_jsonl_record

    pairs = []
    for record in feedback_records(cfg):
        where = f"{cfg.db}#item={record['item_id']}:{record['origin']}"
        pair = parse_jsonl_record(record, where, bad, prompt_template=cfg.prompt_template,
                                  response_prefix=cfg.response_prefix)
        if pair is not None:
            pairs.append(pair)
    return pairs
