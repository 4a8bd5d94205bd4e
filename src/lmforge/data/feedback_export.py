"""Judgments -> the `{prompt, chosen, rejected}` pairs the reward stage trains on.

    python -m lmforge.feedback export db=<feedback.db> out=pairs.jsonl [keep_ties=false]

Which pairs a database gives:

* a judgment "A is better" (or B): one pair, chosen = the preferred response. With
  aggregate=all (default) every annotator's judgment is a pair (agreeing votes weigh more,
  disagreeing ones cancel out in the Bradley-Terry loss); aggregate=majority keeps one pair per
  item, the most frequent answer's, and drops items without a single most frequent answer.
* thumbs: per prompt, every response with more up- than down-votes (over annotators, each
  annotator's latest vote) is chosen over every response of the same prompt with more down-
  than up-votes (e.g. the up-voted response of one pair over the down-voted one of another).
  A "both bad" judgment counts as a down-vote of both responses by that annotator unless they
  voted on the response themselves. Pairs a judgment already gave are not repeated.
* ties and both-bad say the two responses are equally good (or bad): no Bradley-Terry pair
  can say that, so they are left out, unless keep_ties=true (ties) or keep_both_bad=true:
  then each is written as two mirrored pairs, (A over B) and (B over A). Trained on both,
  the Bradley-Terry loss -log s(d) - log s(-d) is smallest when the two rewards are equal,
  which is what the tie says (it equals the soft-label 0.5 objective, twice).

Responses are stored as generated, after the prompt template (usually with a leading space,
the data config's response_prefix " "); that prefix is removed on export because the reward
stage puts data.response_prefix back. Pairs the reward stage would refuse (an empty response,
two identical ones) are skipped and counted. Every record carries "origin" (judgment | thumbs
| tie | both_bad), "item_id" and "annotator" besides prompt/chosen/rejected.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING

from lmforge.data.feedback_store import Item, Store

AGGREGATES = ("all", "majority")


@dataclass
class ExportOptions:
    keep_ties: bool = False
    keep_both_bad: bool = False
    thumbs: bool = True  # thumbs up/down on the same prompt become pairs too
    aggregate: str = "all"  # all | majority
    annotators: Optional[List[str]] = None  # only these annotators' judgments and votes
    response_prefix: str = " "  # removed from responses (the reward stage adds data.response_prefix)


@dataclass
class ExportConfig(ExportOptions):
    db: str = MISSING
    out: str = MISSING


@dataclass
class ExportResult:
    records: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def _strip(text: str, prefix: str) -> str:
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def _majority(choices: list[str]) -> str | None:
    ranked = Counter(choices).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


def preference_records(store: Store, opts: ExportOptions | None = None) -> ExportResult:
    """Every pair the database gives under opts, in a stable order, and what was skipped."""
    opts = opts or ExportOptions()
    if opts.aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={opts.aggregate!r}: use one of {', '.join(AGGREGATES)}")
    wanted = set(opts.annotators) if opts.annotators else None
    items: dict[str, Item] = {i.id: i for i in store.items()}
    judgments = [j for j in store.judgments() if wanted is None or j["annotator"] in wanted]
    ratings = [r for r in store.current_ratings() if wanted is None or r["annotator"] in wanted]
    result = ExportResult()
    seen: set[tuple[str, str, str]] = set()

    def emit(item: Item, chosen: str, rejected: str, origin: str, annotator: str) -> None:
        c, r = _strip(chosen, opts.response_prefix), _strip(rejected, opts.response_prefix)
        if not item.prompt.strip():
            result.counts["skipped_empty_prompt"] += 1
        elif not c.strip() or not r.strip():
            result.counts["skipped_empty_response"] += 1
        elif c.strip() == r.strip():
            result.counts["skipped_identical_responses"] += 1
        else:
            seen.add((item.prompt, c, r))
            result.records.append(
                {
                    "prompt": item.prompt,
                    "chosen": c,
                    "rejected": r,
                    "origin": origin,
                    "item_id": item.id,
                    "annotator": annotator,
                }
            )
            result.counts[origin] += 1

    # -- comparisons
    if opts.aggregate == "majority":
        by_item: dict[str, list[dict]] = defaultdict(list)
        for j in judgments:
            by_item[j["item_id"]].append(j)
        decisions = []
        for item_id, js in by_item.items():
            choice = _majority([j["choice"] for j in js])
            if choice is None:
                result.counts["skipped_no_majority"] += 1
                continue
            names = ",".join(sorted(j["annotator"] for j in js if j["choice"] == choice))
            decisions.append((min(j["id"] for j in js), item_id, choice, names))
        decisions.sort()
        decided = [(item_id, choice, names) for _, item_id, choice, names in decisions]
    else:
        decided = [(j["item_id"], j["choice"], j["annotator"]) for j in judgments]
    for item_id, choice, annotator in decided:
        item = items.get(item_id)
        if item is None:
            result.counts["skipped_unknown_item"] += 1
            continue
        a, b = item.response_a, item.response_b
        if choice == "a":
            emit(item, a, b, "judgment", annotator)
        elif choice == "b":
            emit(item, b, a, "judgment", annotator)
        elif (choice == "tie" and opts.keep_ties) or (choice == "both_bad" and opts.keep_both_bad):
            emit(item, a, b, choice, annotator)
            emit(item, b, a, choice, annotator)
        else:
            result.counts[f"excluded_{choice}"] += 1

    # -- thumbs up/down (and both-bad as down-votes) on the same prompt
    if opts.thumbs:
        votes: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)  # (item, side) -> annotator -> vote
        for r in ratings:
            if r["thumb"] is not None and r["item_id"] in items:
                votes[(r["item_id"], r["side"])][r["annotator"]] = r["thumb"]
        for j in judgments:
            if j["choice"] == "both_bad" and j["item_id"] in items:
                for side in ("a", "b"):
                    votes[(j["item_id"], side)].setdefault(j["annotator"], -1)
        net: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # prompt -> response -> net
        first: dict[tuple[str, str], Item] = {}
        voters: dict[tuple[str, str], set] = defaultdict(set)
        for (item_id, side), by in sorted(votes.items()):
            item = items[item_id]
            text = item.response_a if side == "a" else item.response_b
            net[item.prompt][text] += sum(by.values())
            first.setdefault((item.prompt, text), item)
            voters[(item.prompt, text)] |= set(by)
        for prompt in net:
            up = [t for t, v in net[prompt].items() if v > 0]
            down = [t for t, v in net[prompt].items() if v < 0]
            for u in up:
                for d in down:
                    key = (prompt, _strip(u, opts.response_prefix), _strip(d, opts.response_prefix))
                    if key in seen:
                        result.counts["thumbs_already_a_judgment"] += 1
                        continue
                    names = ",".join(sorted(voters[(prompt, u)] | voters[(prompt, d)]))
                    emit(first[(prompt, u)], u, d, "thumbs", names)
    result.counts["pairs"] = len(result.records)
    return result


def write_jsonl(records: list[dict], out: str | Path) -> None:
    """Write atomically: a reader never sees half a file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export(cfg: ExportConfig) -> dict:
    store = Store(cfg.db, readonly=True)
    result = preference_records(store, cfg)
    write_jsonl(result.records, cfg.out)
    return {"out": str(cfg.out), **dict(sorted(result.counts.items()))}
