"""Preference records as the reward stage reads them: one comparison (:class:`PreferencePair`)
from a JSONL record, an HH dialogue pair, the synthetic world's annotator, or a file of extra pairs
on the world's training prompts (`data.extra_pairs`, e.g. from `python -m lmforge.label`).
:mod:`lmforge.data.preference_data` encodes, splits and batches them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from typing import Iterator

from lmforge.data.templates import BadRecords, render_prompt
from lmforge.errors import DataError


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


def extra_world_pairs(cfg, bad: BadRecords) -> list[PreferencePair]:
    """data.extra_pairs: a JSONL of pairs on the world's *training* prompts (a held-out prompt
    would leak the evaluation into training and is refused), rendered like the world's pairs."""
    from lmforge.world.splits import split_of
    from lmforge.world.tasks import parse_task

    out = []
    for where, obj in iter_json_objects(cfg.extra_pairs, bad, "data.extra_pairs"):
        pair = parse_jsonl_record(
            obj, where, bad, prompt_template=cfg.prompt_template, response_prefix=cfg.response_prefix
        )
        if pair is None:
            continue
        try:
            task = parse_task(obj["prompt"])
        except ValueError:
            bad.report("not a task of the synthetic world", where, "data.extra_pairs")
            continue
        split = split_of(task.prompt)
        if split != "train":
            raise DataError(
                f"{where}: prompt {task.prompt!r} is a held-out ({split}) prompt of the synthetic world; "
                "data.extra_pairs may hold training prompts only (training on it would leak the evaluation)"
            )
        scores = {k: obj[k] for k in ("chosen_score", "rejected_score") if isinstance(obj.get(k), (int, float))}
        out.append(replace(pair, kind=task.kind, **scores))
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
